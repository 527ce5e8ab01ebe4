"""Bearer-token verification (Cognito RS256 via JWKS, or development HS256) and permissions.

Routes declare what they need with the dependencies in ``pie.deps``; this module only turns a
token into a :class:`Principal` and answers permission and tenant questions about it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from jose import JOSEError, jwk, jwt

from pie.config import Settings
from pie.errors import Forbidden, ServiceUnavailable, Unauthorized
from pie.schemas import ID_PATTERN

log = logging.getLogger("pie.auth")

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
# a tenant named by a token is only usable when it is a well-formed client id (no path could
# address any other, and NUL or surrogate characters in it would break tenant-filtered queries)
_CLIENT_ID = re.compile(ID_PATTERN)
DEV_SECRET_FILE = "dev-jwt-secret"


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
    # a machine token (no username) with a well-formed ``client_id`` claim: its tenant is
    # looked up (``pie.auth.app_clients``) and replaces the provisional ``tenants``
    machine_claim: str | None = None
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
    """Map verified claims to permissions and tenant access (spec 2.2-2.4). 401 when a
    ``client:`` group does not name a well-formed client id (spec 15.5)."""
    raw_scope = claims.get("scope") or ""
    scopes = frozenset(raw_scope.split()) if isinstance(raw_scope, str) else frozenset()
    raw_groups = claims.get("cognito:groups") or []
    groups = frozenset(g for g in raw_groups if isinstance(g, str)) if isinstance(raw_groups, list) else frozenset()
    app_client_id = claims.get("client_id") if isinstance(claims.get("client_id"), str) else None
    username = claims.get("username") if isinstance(claims.get("username"), str) else None

    permissions: set[str] = set()
    tenants: set[str] = set()
    for scope in scopes:
        if scope.startswith(SCOPE_PREFIX) and scope[len(SCOPE_PREFIX) :] in PERMISSIONS:
            permissions.add(scope[len(SCOPE_PREFIX) :])
    is_admin = "admin" in permissions or ADMIN_GROUP in groups
    for group in sorted(groups):
        if group.startswith(CLIENT_GROUP_PREFIX):
            tenant_id = group[len(CLIENT_GROUP_PREFIX) :]
            # a group naming no valid client id would grant the group's permissions with no
            # tenant, i.e. make a platform caller: the token is refused instead (spec 15.5)
            if not _CLIENT_ID.fullmatch(tenant_id):
                raise Unauthorized(
                    f"invalid token: the group {_shown(group)} does not name a valid client id "
                    f"(a client: group must be client:<id>, the id matching {ID_PATTERN})"
                )
            tenants.add(tenant_id)
            permissions |= CLIENT_GROUP_PERMISSIONS
    # A machine token (client-credentials: no username) acts for one tenant, found from its
    # client_id claim (spec 14.2). Provisionally the claim itself (development tokens); the
    # request's dependency resolves it through the clients' app_client_ids (``with_tenant``).
    # A human token's client_id is the app client, never a tenant.
    machine_claim = None
    if username is None and app_client_id and _CLIENT_ID.fullmatch(app_client_id):
        tenants.add(app_client_id)
        machine_claim = app_client_id
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
        machine_claim=machine_claim,
        claims=claims,
    )


def _shown(value: str, limit: int = 80) -> str:
    """``value`` quoted for a message (cut at ``limit`` characters: it comes from the token)."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def with_tenant(principal: Principal, tenant: str | None) -> Principal:
    """A machine principal acting for ``tenant`` (None: no tenant, a platform caller)."""
    return dataclasses.replace(principal, tenants=frozenset({tenant}) if tenant else frozenset())


def dev_secret(settings: Settings) -> str | None:
    """The HS256 secret: PIE_JWT_SECRET, or (zero-setup local mode, no Cognito configured) a
    random secret persisted under PIE_DATA_DIR so `pie serve` and `pie token` agree."""
    if settings.jwt_secret:
        return settings.jwt_secret
    if settings.cognito_jwks_url:
        return None
    path = Path(settings.data_dir) / DEV_SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: when two processes start at once, exactly one secret is written
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # the creator may not have written it yet
            value = path.read_text().strip()
            if value:
                return value
            time.sleep(0.01)
        raise RuntimeError(f"{path} is empty; delete it or set PIE_JWT_SECRET") from None
    value = secrets.token_urlsafe(48)
    with os.fdopen(fd, "w") as f:
        f.write(value)
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
    most once per cooldown, so a stream of garbage ``kid``s cannot hammer the endpoint.

    ``clock`` is injectable (tests)."""

    def __init__(self, url: str, cooldown: float, *, clock: Callable[[], float] = time.monotonic):
        self.url = url
        self.cooldown = cooldown
        self.clock = clock
        self.keys: dict[str, dict[str, Any]] = {}
        self.last_fetch: float | None = None
        self.last_error: str | None = None
        self.fetch_count = 0
        self._lock = asyncio.Lock()

    async def _fetch(self) -> None:
        self.last_fetch = self.clock()
        self.fetch_count += 1
        try:
            async with httpx.AsyncClient(timeout=5.0) as client:
                response = await client.get(self.url)
                response.raise_for_status()
                data = response.json()
            if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
                raise ValueError("JWKS document has no 'keys' list")
        except (httpx.HTTPError, ValueError) as exc:
            self.last_error = f"{exc.__class__.__name__}: {exc}"
            log.warning("cannot fetch signing keys from %s: %s", self.url, self.last_error)
            return
        self.last_error = None
        self.keys = {k["kid"]: k for k in data["keys"] if isinstance(k, dict) and isinstance(k.get("kid"), str)}

    async def get(self, kid: str) -> dict[str, Any] | None:
        """The key for ``kid``, or None when it is unknown even after a (cooldown-limited)
        refetch. 503 when the keys cannot be fetched at all (not the caller's fault)."""
        if kid in self.keys:
            return self.keys[kid]
        async with self._lock:
            if kid in self.keys:
                return self.keys[kid]
            if self.last_fetch is None or self.clock() - self.last_fetch >= self.cooldown:
                await self._fetch()
            if kid in self.keys:
                return self.keys[kid]
            if self.last_error is not None:
                raise ServiceUnavailable("cannot fetch the token signing keys; try again later")
            return None


class TokenVerifier:
    """Turns a bearer token into a :class:`Principal`; every rejection is a 401."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.secret = dev_secret(settings)
        jwks_url = settings.cognito_jwks_url
        if jwks_url and not settings.cognito_issuer:
            raise RuntimeError(
                "PIE_JWKS_URL is set without an issuer: set PIE_JWT_RS256_ISSUER "
                "(or PIE_COGNITO_REGION and PIE_COGNITO_USER_POOL_ID)"
            )
        self.jwks = JWKSCache(jwks_url, settings.jwks_refetch_cooldown_seconds) if jwks_url else None

    async def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except (JOSEError, ValueError, TypeError, ArithmeticError, RecursionError) as exc:
            raise Unauthorized("malformed bearer token") from exc
        if not isinstance(header, dict):
            raise Unauthorized("malformed bearer token")
        # only the configured algorithm(s): never "none", never HS256 where RS256 is configured
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
        return self._decode(token, self.secret, "HS256", self.settings.jwt_issuer)

    async def _verify_rs256(self, token: str, header: dict[str, Any]) -> dict[str, Any]:
        assert self.jwks is not None
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthorized("token has no key id")
        key = await self.jwks.get(kid)
        if key is None:
            raise Unauthorized("unknown signing key")
        if key.get("kty") != "RSA" or key.get("alg", "RS256") != "RS256":
            raise Unauthorized("signing key is not an RS256 key")
        try:
            public_key = jwk.construct(key, algorithm="RS256")
        except (JOSEError, ValueError, TypeError) as exc:
            raise Unauthorized("unusable signing key") from exc
        claims = self._decode(token, public_key, "RS256", self.settings.cognito_issuer)
        if claims.get("token_use") != "access":
            raise Unauthorized("not an access token")
        allowed = self.settings.cognito_app_client_ids
        if allowed and claims.get("client_id") not in allowed:
            raise Unauthorized("app client not allowed")
        return claims

    def _decode(self, token: str, key: Any, algorithm: str, issuer: str | None) -> dict[str, Any]:
        if not issuer:
            raise Unauthorized("no issuer configured for this token type")
        leeway = self.settings.jwt_leeway_seconds
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=issuer,
                # exp: python-jose, strictly; nbf and iat: check_time_claims, with the leeway
                options={"require_exp": True, "require_iss": True, "verify_aud": False, "verify_nbf": False},
            )
        # ArithmeticError: an infinite exp/nbf/iat (1e400); RecursionError: absurdly nested claims
        except (JOSEError, ValueError, TypeError, ArithmeticError, RecursionError) as exc:
            raise Unauthorized(f"invalid token: {exc}") from exc
        if not isinstance(claims, dict):
            raise Unauthorized("invalid token: claims are not an object")
        check_time_claims(claims, now=time.time(), leeway=leeway)
        return claims


TIME_CLAIMS = ("exp", "nbf", "iat")


def check_time_claims(claims: dict[str, Any], *, now: float, leeway: float) -> None:
    """RFC 7519 NumericDate claims are JSON numbers: ``exp``/``nbf``/``iat``, where present, must
    be finite numbers (python-jose accepts ``"exp": "9999999999"`` by calling ``int()`` on it),
    and a token cannot be used before ``nbf`` or be issued in the future (``iat``; python-jose does
    not check it), ``leeway`` seconds of issuer clock skew allowed. ``exp`` is python-jose's, strict:
    an expired token is refreshed, not tolerated."""
    for name in TIME_CLAIMS:
        if name not in claims:
            continue
        value = claims[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise Unauthorized(f"invalid token: the {name} claim must be a number (seconds since the epoch)")
    nbf = claims.get("nbf")
    if nbf is not None and nbf > now + leeway:
        raise Unauthorized("invalid token: not valid yet (nbf)")
    iat = claims.get("iat")
    if iat is not None and iat > now + leeway:
        raise Unauthorized("invalid token: issued in the future (iat)")


class CachedTokenVerifier:
    """A bounded LRU of verified tokens wrapped around a :class:`TokenVerifier` (whose checks —
    signature, issuer, claims — all stay inside it and run on every miss).

    Keyed on the raw token string, so an entry is never shared between different tokens; an
    entry expires at the token's ``exp`` (and at most ``max_age`` seconds after it was verified,
    so a retired signing key stops being honoured soon). A token whose ``exp`` has passed is
    refused here even when the wrapped verifier would still accept it (its clock has whole-second
    granularity). Failures are never cached. ``clock`` (wall-clock seconds) is injectable."""

    def __init__(
        self,
        verifier: TokenVerifier,
        *,
        maxsize: int,
        max_age: float,
        clock: Callable[[], float] = time.time,
    ):
        from cachetools import TLRUCache

        self.verifier = verifier
        self.max_age = max_age
        self.clock = clock
        # an item is dropped once clock() >= its expiry (the ttu value computed at insertion)
        self._cache: TLRUCache[str, tuple[Principal, float]] = TLRUCache(
            maxsize=maxsize, ttu=lambda _token, entry, _now: entry[1], timer=clock
        )

    def __getattr__(self, name: str) -> Any:  # settings, jwks, ... of the wrapped verifier
        return getattr(self.verifier, name)

    async def verify(self, token: str) -> Principal:
        entry = self._cache.get(token)
        now = self.clock()
        if entry is not None and now < entry[1]:
            return entry[0]
        principal = await self.verifier.verify(token)
        exp = principal.claims.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, (int, float)):
            return principal  # no usable exp (the verifier requires one): never cached
        if now >= exp:
            raise Unauthorized("invalid token: Signature has expired.")
        if self._cache.maxsize > 0 and self.max_age > 0:
            self._cache[token] = (principal, min(float(exp), now + self.max_age))
        return principal

    def clear(self) -> None:
        self._cache.clear()


def make_verifier(settings: Settings) -> TokenVerifier | CachedTokenVerifier:
    """The process's verifier: cached unless PIE_TOKEN_CACHE_SIZE or _SECONDS is 0."""
    verifier = TokenVerifier(settings)
    if settings.token_cache_size <= 0 or settings.token_cache_seconds <= 0:
        return verifier
    return CachedTokenVerifier(verifier, maxsize=settings.token_cache_size, max_age=settings.token_cache_seconds)
