"""Dependencies routes declare: the unit of work, the caller, permissions, the tenant scope."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from pie import callbacks, db, policies
from pie.auth import Principal, TokenVerifier, with_tenant
from pie.clients.app_clients import tenant_of_app_client
from pie.clients.models import Client
from pie.db import get_session
from pie.errors import NotFound, Unauthorized
from pie.schemas import ID_PATTERN

# scope="function": the transaction commits when the endpoint returns, before the response is sent
Session = Annotated[AsyncSession, Depends(get_session, scope="function")]

_bearer = HTTPBearer(auto_error=False, description="Cognito access token (or `pie token` in development)")


async def current_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    header = request.headers.get("authorization")
    if not header:
        raise Unauthorized("missing bearer token")
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise Unauthorized("malformed Authorization header; expected 'Bearer <token>'")
    token = credentials.credentials
    if callbacks.is_callback_token(token):
        principal = await _callback_principal(request, token)
    else:
        principal = await bearer_principal(request.app.state, token)
    request.state.principal = principal  # the access log line names the caller
    return principal


async def bearer_principal(app_state: Any, token: str) -> Principal:
    """The caller of a (non-callback) bearer token: verified (``app_state.verifier``, cached
    until the token's exp) and, for a machine token, bound to its client's tenant (401 when the
    token is not valid)."""
    verifier: TokenVerifier = app_state.verifier
    principal = await verifier.verify(token)
    if principal.machine_claim is not None:
        ttl = app_state.settings.tenant_cache_seconds
        principal = with_tenant(principal, await tenant_of_app_client(principal.machine_claim, ttl))
    return principal


CALLBACK_OPERATION = "completemodeljob"


async def _callback_principal(request: Request, token: str) -> Principal:
    """A job's callback token (spec 14.5) authenticates on ``completemodeljob`` only (401 on
    every other route); the route checks it names that job (``callback_grant``)."""
    route = request.scope.get("route")
    if getattr(route, "operation_id", None) != CALLBACK_OPERATION:
        raise Unauthorized("a callback token is valid only for completing its own job")
    async with db.sessionmaker()() as session:
        grant = await callbacks.verify(session, token, leeway=request.app.state.settings.jwt_leeway_seconds)
    return Principal(
        subject=f"callback:{grant.job_id}",
        permissions=frozenset({"complete_jobs"}),
        tenants=frozenset({grant.client_id}) if grant.client_id else frozenset(),
        claims={
            "callback_job_id": grant.job_id,
            "callback_model_id": grant.model_id,
            "callback_model_version": grant.model_version,
            "kid": grant.kid,
        },
    )


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


async def authenticate(request: Request) -> Principal:
    """``current_principal`` outside dependency resolution (401 without a valid bearer token)."""
    return await current_principal(request, await _bearer(request))


def require(permission: str):
    """Dependency: the caller, who must hold ``permission`` (403 otherwise)."""

    async def dependency(principal: CurrentPrincipal) -> Principal:
        principal.require(permission)
        return principal

    dependency.__name__ = f"require_{permission}"
    return Depends(dependency)


ClientIdPath = Annotated[str, Path(pattern=ID_PATTERN, description="client (tenant) id", examples=["client-1"])]
DomainIdPath = Annotated[str, Path(pattern=ID_PATTERN, examples=["south_australia"])]
ServiceIdPath = Annotated[str, Path(pattern=ID_PATTERN, examples=["service-1"])]
ModelIdPath = Annotated[str, Path(pattern=ID_PATTERN, examples=["model_price_reco_v1"])]
ModelVersionPath = Annotated[str, Path(pattern=ID_PATTERN, examples=["1"])]


@dataclass
class TenantScope:
    """An authenticated caller bound to one client they may access. Every tenant query is built
    from ``scope.client_id``, so no route can forget the tenant filter."""

    principal: Principal
    client: Client

    @property
    def client_id(self) -> str:
        return self.client.client_id


async def tenant_scope(session: AsyncSession, principal: Principal, client_id: str, permission: str) -> TenantScope:
    """The tenant rule shared by the API and the console: permission (403), tenant access (403),
    then client existence (404)."""
    policies.require_tenant(principal, client_id, permission)
    client = await session.get(Client, client_id)
    if client is None:
        raise NotFound(f"client {client_id} not found")
    return TenantScope(principal=principal, client=client)


def tenant(permission: str):
    """Dependency: permission check, tenant access (403) and client existence (404)."""

    async def dependency(client_id: ClientIdPath, principal: CurrentPrincipal, session: Session) -> TenantScope:
        return await tenant_scope(session, principal, client_id, permission)

    dependency.__name__ = f"tenant_{permission}"
    return Depends(dependency)
