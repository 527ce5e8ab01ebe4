"""Idempotency keys (spec 14.4, Stripe's semantics) for the POSTs that create jobs or records.

A route opts in with ``dependencies=[IDEMPOTENT]``. With an ``Idempotency-Key`` header, once
every dependency of the route has passed -- the caller is authenticated and holds the route's
permission and tenant access (spec 15.5: a caller who may not make the request now gets that
401/403, never a stored answer) -- and the body is valid, and just before the endpoint runs (``pie.http.routing.before_endpoint``), the key is checked
(1-255 printable ASCII characters; else 400) and the request's own transaction inserts
``idempotency_keys(caller, key)``:

- the insert succeeds: this request owns the key. When the endpoint has answered, the rendered
  response (status, body, content type, location) and the tenant the request acted in (its
  audit entry's ``client_id``) are written into that row *in the same transaction* as the
  endpoint's writes (:class:`pie.http.routing.PieRoute` runs the hook after the response is rendered
  and before the commit). A failed request rolls back, key included, so the caller can retry it;
- another request with the key is still running: PostgreSQL makes the insert wait for it (the
  unique key), so concurrent requests with one key produce one effect;
- the key was used before by the same caller: with the same request (method, path, query and
  body bytes) the first response is replayed (``Idempotent-Replayed: true``) and nothing is
  written -- unless the caller can no longer access the tenant that response belongs to (a
  direct-inference job's tenant comes from the body or the caller's only tenant, not the path):
  403; with a different request it is a 422.

The caller is the token's issuer + subject + app client. Keys live PIE_IDEMPOTENCY_KEY_TTL_SECONDS
(24 h); an expired key counts as new, and every keyed request purges a few expired rows. The
tenant is kept in the row's ``response_headers`` object under ``pie:tenant`` (a name no HTTP
header can have; never replayed as a header).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, NoReturn

from fastapi import Depends, Header, Request
from fastapi.responses import Response
from sqlalchemy import text

from pie.audit import context as audit_context
from pie.auth import Principal
from pie.deps import CurrentPrincipal, Session
from pie.errors import BadRequest, Conflict, PieError, Unprocessable
from pie.http.headers import IDEMPOTENCY_KEY
from pie.http.routing import before_endpoint

HEADER = IDEMPOTENCY_KEY
_KEY = re.compile(r"^[\x20-\x7e]{1,255}$")
_PURGE_BATCH = 100
_KEPT_HEADERS = ("content-type", "location")
_TENANT = "pie:tenant"  # in response_headers: the tenant the first request acted in


class Replay(PieError):
    """Answers the stored first response (rendered by :func:`replay_response`)."""

    def __init__(self, status_code: int, body: bytes, headers: dict[str, str]):
        super().__init__("replayed")
        self.status_code = status_code
        self.content = body
        self.replay_headers = headers


async def replay_response(request: Request, exc: Replay) -> Response:
    return Response(
        content=exc.content, status_code=exc.status_code, headers={**exc.replay_headers, "Idempotent-Replayed": "true"}
    )


def caller_of(principal: Principal) -> str:
    claims = principal.claims or {}
    return json.dumps([claims.get("iss"), principal.subject, principal.app_client_id], separators=(",", ":"))


def fingerprint(request: Request, body: bytes) -> str:
    digest = hashlib.sha256()
    for part in (request.method.encode(), request.url.path.encode(), request.url.query.encode()):
        digest.update(len(part).to_bytes(8, "big") + part)
    digest.update(body)
    return digest.hexdigest()


_CLAIM = text(
    """
    INSERT INTO idempotency_keys (caller, key, fingerprint, expires_at)
    VALUES (:caller, :key, :fingerprint, now() + make_interval(secs => :ttl))
    ON CONFLICT (caller, key) DO UPDATE
        SET fingerprint = EXCLUDED.fingerprint, expires_at = EXCLUDED.expires_at, created_at = now(),
            status_code = NULL, response_body = NULL, response_headers = NULL
        WHERE idempotency_keys.expires_at <= now()
    RETURNING caller
    """
)
_STORED = text(
    "SELECT fingerprint, status_code, response_body, response_headers FROM idempotency_keys "
    "WHERE caller = :caller AND key = :key"
)
_PURGE = text(
    "DELETE FROM idempotency_keys WHERE ctid = ANY(ARRAY("
    "SELECT ctid FROM idempotency_keys WHERE expires_at <= now() LIMIT :n FOR UPDATE SKIP LOCKED))"
)
_RECORD = text(
    "UPDATE idempotency_keys SET status_code = :status, response_body = :body, "
    "response_headers = CAST(:headers AS jsonb) WHERE caller = :caller AND key = :key"
)
_RELEASE = text("DELETE FROM idempotency_keys WHERE caller = :caller AND key = :key")


async def purge_expired(session: Any, limit: int = _PURGE_BATCH) -> int:
    result = await session.execute(_PURGE, {"n": limit})
    return result.rowcount or 0


async def _idempotency(
    request: Request,
    principal: CurrentPrincipal,
    session: Session,
    key: Annotated[
        str | None,
        Header(
            alias=HEADER,
            description="Makes a retry safe: the same key, caller and request replay the first response "
            "(`Idempotent-Replayed: true`) without writing; the same key with a different request is a 422. "
            "1-255 printable ASCII characters; kept 24 hours.",
            examples=["6f1c0a7e-3f43-4d0e-9a4c-1b2d3e4f5a6b"],
        ),
    ] = None,
) -> None:
    if key is None:
        return
    caller = caller_of(principal)
    mine = fingerprint(request, await request.body())
    ttl = request.app.state.settings.idempotency_key_ttl_seconds

    async def claim() -> None:  # after the route's authentication and authorization
        if not _KEY.fullmatch(key):
            raise BadRequest(f"{HEADER} must be 1-255 printable ASCII characters")
        await purge_expired(session)
        params = {"caller": caller, "key": key}
        claimed = (await session.execute(_CLAIM, {**params, "fingerprint": mine, "ttl": ttl})).first()
        if claimed is None:
            _replay(principal, key, (await session.execute(_STORED, params)).one(), mine)
        # the audit entry of this request (opened by the route's ``audited`` dependency): the
        # tenant the logic acted in is known once the endpoint has run
        entry = audit_context.entry(session)

        async def record(response: Response) -> None:
            body = getattr(response, "body", None)
            if response.status_code >= 500 or not isinstance(body, (bytes, bytearray)):
                await session.execute(_RELEASE, params)  # nothing to replay: the key stays usable
                return
            kept: dict[str, Any] = {name: response.headers[name] for name in _KEPT_HEADERS if name in response.headers}
            if entry is not None and entry.client_id is not None:
                kept[_TENANT] = entry.client_id
            await session.execute(
                _RECORD, {**params, "status": response.status_code, "body": bytes(body), "headers": json.dumps(kept)}
            )

        request.state.after_response = [*getattr(request.state, "after_response", []), record]

    before_endpoint(request, claim)


def _replay(principal: Principal, key: str, stored: Any, mine: str) -> NoReturn:
    """Raise what a used key answers: 422 for another request, the stored response (as
    :class:`Replay`) for the same one -- 403 when the caller cannot access its tenant now."""
    if stored.fingerprint != mine:
        raise Unprocessable(f"{HEADER} {key!r} was already used with a different request")
    if stored.status_code is None:  # not expected: responses are recorded before the commit
        raise Conflict(f"the request with {HEADER} {key!r} has no recorded response; retry later")
    headers = dict(stored.response_headers or {})
    tenant = headers.pop(_TENANT, None)
    if isinstance(tenant, str):
        principal.require_tenant(tenant)
    raise Replay(stored.status_code, bytes(stored.response_body or b""), headers)


#: ``dependencies=[IDEMPOTENT]`` on a POST route that creates something
IDEMPOTENT = Depends(_idempotency)


def install(app: Any) -> None:
    app.add_exception_handler(Replay, replay_response)
