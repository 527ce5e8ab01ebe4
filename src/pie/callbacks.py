"""Per-job callback credentials (spec 14.5).

Every dispatched payload carries a ``callback_token``: an HS256 JWT signed with a PIE signing
key, bound to one job (its id, model, version and tenant) and expiring after the job's time-out
plus a margin. ``completemodeljob`` accepts it as the bearer token for that job only; every other
route rejects it (a different issuer and key than any caller token).

Signing keys live in the ``signing_keys`` table, so every API process and dispatcher shares
them; the first dispatch creates one when none exists. Rotation (``pie keys rotate``) adds a
newer key that signs from then on; older keys keep verifying until they are retired
(``pie keys retire KID``), so jobs in flight during a rotation still complete.

No process keeps a signing key: a dispatcher reads the newest active key in the transaction that
claims the jobs (:data:`SIGNING_KEY_SQL`, one statement with the claim), share-locks it and signs
their tokens before that transaction commits. ``retire`` locks the key row for update, so it
waits for any claim signing with that key and every later claim sees it retired: from the moment
``pie keys retire`` returns, the key signs nothing more, in any process (spec 15.5).

A lower module: it imports only the database base, the error types and the claim rules of
``pie.auth``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from types import SimpleNamespace
from typing import Any

import psycopg
from jose import JOSEError, jwt
from sqlalchemy import DateTime, String, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from pie.auth import check_time_claims
from pie.db import Base
from pie.errors import Unauthorized

ISSUER = "pie-callback"
AUDIENCE = "completemodeljob"
ALGORITHM = "HS256"
_KEY_LOCK = 7_304_121_455  # advisory lock id: one process creates the first key


class SigningKey(Base):
    __tablename__ = "signing_keys"

    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    secret: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True)
class Key:
    kid: str
    secret: str


def new_key() -> Key:
    return Key(kid=f"cb-{secrets.token_hex(8)}", secret=secrets.token_urlsafe(48))


_CURRENT = text(
    "SELECT kid, secret FROM signing_keys WHERE retired_at IS NULL ORDER BY created_at DESC, kid DESC LIMIT 1"
)
#: the key that signs, share-locked until the signing transaction ends (``retire`` waits for it);
#: a key retired meanwhile is skipped (the lock's recheck), so the next newest active one signs
SIGNING_KEY_SQL = (
    "SELECT kid, secret FROM signing_keys WHERE retired_at IS NULL ORDER BY created_at DESC, kid DESC LIMIT 1 FOR SHARE"
)


async def signing_key(conn: psycopg.AsyncConnection[Any]) -> Key:
    """The newest active signing key, share-locked in ``conn``'s open transaction (sign before it
    commits), created when there is none (one process creates it: an advisory lock)."""
    row = await (await conn.execute(SIGNING_KEY_SQL)).fetchone()
    if row is None:
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_KEY_LOCK,))
        row = await (await conn.execute(SIGNING_KEY_SQL)).fetchone()
        if row is None:
            key = new_key()
            await conn.execute("INSERT INTO signing_keys (kid, secret) VALUES (%s, %s)", (key.kid, key.secret))
            return key
    return Key(row[0], row[1])


def mint(key: Key, job: Any, ttl_seconds: float, *, now: float | None = None) -> str:
    """A callback token for ``job`` (anything with job_id, model_id, model_version, client_id)."""
    issued = int(now if now is not None else time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": f"job:{job.job_id}",
        "job_id": str(job.job_id),
        "model_id": job.model_id,
        "model_version": job.model_version,
        "client_id": job.client_id,
        "iat": issued,
        "exp": issued + max(int(ttl_seconds), 1),
    }
    return jwt.encode(claims, key.secret, algorithm=ALGORITHM, headers={"kid": key.kid})


class Signer:
    """Mints the callback tokens of many jobs with one key, byte for byte the tokens
    :func:`mint` (python-jose) produces, at a fraction of the cost: the header is encoded once
    per key, the claims of one model version, tenant and time-out once per second, and the
    HMAC key schedule once (``hmac.copy``). A dispatcher signs a token per claimed job, so
    this is on its hot path; ``tests/test_dispatch_pipeline.py`` checks every token against
    :func:`mint` and :func:`verify`."""

    def __init__(self, key: Key):
        self.key = key
        header = json.dumps({"typ": "JWT", "alg": ALGORITHM, "kid": key.kid}, separators=(",", ":"), sort_keys=True)
        self._header = _b64(header.encode())
        self._mac = hmac.new(key.secret.encode(), digestmod=hashlib.sha256)
        self._prefixes: dict[tuple[str, str, str | None, int, int], tuple[str, str]] = {}

    def sign(self, job: Any, ttl_seconds: float, *, now: float | None = None) -> str:
        issued = int(now if now is not None else time.time())
        ttl = max(int(ttl_seconds), 1)
        job_id = str(job.job_id)
        cache_key = (job.model_id, job.model_version, job.client_id, ttl, issued)
        parts = self._prefixes.get(cache_key)
        if parts is None:
            if len(self._prefixes) > 256:
                self._prefixes.clear()
            # the claims of mint(), in its order, as json.dumps(separators=(",", ":")) writes them
            tail = json.dumps(
                {
                    "model_id": job.model_id,
                    "model_version": job.model_version,
                    "client_id": job.client_id,
                    "iat": issued,
                    "exp": issued + ttl,
                },
                separators=(",", ":"),
            )
            parts = self._prefixes[cache_key] = ('{"iss":"pie-callback","aud":"completemodeljob","sub":', tail[1:])
        quoted = json.dumps(job_id)
        claims = f'{parts[0]}{json.dumps("job:" + job_id)},"job_id":{quoted},{parts[1]}'
        signing_input = self._header + b"." + _b64(claims.encode())
        mac = self._mac.copy()
        mac.update(signing_input)
        return (signing_input + b"." + _b64(mac.digest())).decode()


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def placeholder(job: Any, ttl_seconds: float) -> str:
    """A token exactly as long as the one a dispatch will sign (for payload-size checks). Its
    length depends on the claims but not on the time (``iat``/``exp`` keep their number of
    digits), so one is signed per claim set and reused."""
    return _placeholder(str(job.job_id), job.model_id, job.model_version, job.client_id, max(int(ttl_seconds), 1))


@functools.lru_cache(maxsize=1024)
def _placeholder(job_id: str, model_id: str, model_version: str, client_id: str | None, ttl_seconds: int) -> str:
    job = SimpleNamespace(job_id=job_id, model_id=model_id, model_version=model_version, client_id=client_id)
    return mint(Key(kid="cb-" + "0" * 16, secret="x"), job, ttl_seconds)


@functools.lru_cache(maxsize=1024)
def is_callback_token(token: str) -> bool:
    """Whether ``token`` claims to be a callback token (its signature is checked by :func:`verify`).
    The one test of it (``pie.deps`` and the fast layer); remembered per token, as callers send
    the same token again and again (a base64 and JSON decode otherwise on every request)."""
    try:
        claims = jwt.get_unverified_claims(token)
    except (JOSEError, ValueError, TypeError, ArithmeticError, RecursionError):
        return False
    return isinstance(claims, dict) and claims.get("iss") == ISSUER


@dataclass(frozen=True)
class CallbackGrant:
    """What a verified callback token allows: completing one job."""

    job_id: str
    model_id: str
    model_version: str
    client_id: str | None
    kid: str


async def verify(session: AsyncSession, token: str, *, leeway: float = 0.0) -> CallbackGrant:
    """401 unless ``token`` is a valid, unexpired callback token signed by an active key, whose
    time claims obey the rules of API tokens (``pie.auth.check_time_claims``: numeric
    ``exp``/``nbf``/``iat``, not used before ``nbf`` nor issued in the future, ``leeway`` seconds
    of clock skew between PIE's hosts allowed)."""
    try:
        header = jwt.get_unverified_header(token)
    except (JOSEError, ValueError, TypeError, ArithmeticError, RecursionError) as exc:
        raise Unauthorized("malformed callback token") from exc
    kid = header.get("kid") if isinstance(header, dict) else None
    if header.get("alg") != ALGORITHM or not isinstance(kid, str) or not kid or len(kid) > 64:
        raise Unauthorized("malformed callback token")
    row = (await session.execute(select(SigningKey.secret, SigningKey.retired_at).where(SigningKey.kid == kid))).first()
    if row is None or row.retired_at is not None:
        raise Unauthorized("the callback token's signing key is unknown or retired")
    try:
        claims = jwt.decode(
            token,
            row.secret,
            algorithms=[ALGORITHM],
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"require_exp": True, "require_iss": True, "require_aud": True},
        )
    except (JOSEError, ValueError, TypeError, ArithmeticError, RecursionError) as exc:
        raise Unauthorized(f"invalid callback token: {exc}") from exc
    if not isinstance(claims, dict):
        raise Unauthorized("invalid callback token: claims are not an object")
    check_time_claims(claims, now=time.time(), leeway=leeway)
    fields = [claims.get(k) for k in ("job_id", "model_id", "model_version")]
    client_id = claims.get("client_id")
    job_id, model_id, model_version = (v if isinstance(v, str) and v else None for v in fields)
    if job_id is None or model_id is None or model_version is None:
        raise Unauthorized("invalid callback token: missing job claims")
    if not (client_id is None or isinstance(client_id, str)):
        raise Unauthorized("invalid callback token: missing job claims")
    return CallbackGrant(job_id, model_id, model_version, client_id, kid)


# -- key management (the `pie keys` CLI) -------------------------------------------------------


async def list_keys(session: AsyncSession) -> list[SigningKey]:
    return list((await session.scalars(select(SigningKey).order_by(SigningKey.created_at, SigningKey.kid))).all())


async def rotate(session: AsyncSession) -> Key:
    """Add a new signing key; it signs every token from the commit on (older keys keep verifying)."""
    key = new_key()
    session.add(SigningKey(kid=key.kid, secret=key.secret))
    await session.flush()
    return key


async def retire(session: AsyncSession, kid: str, *, force: bool = False) -> SigningKey:
    """Stop accepting tokens signed with ``kid``, and signing with it: the row lock waits for
    every claim signing with it right now, and claims after the commit skip it. Refuses the
    newest active key unless forced (the next dispatch signs with the next newest active key,
    or creates one)."""
    key = await session.get(SigningKey, kid, with_for_update=True)
    if key is None:
        raise LookupError(f"no signing key {kid!r}")
    current = (await session.execute(_CURRENT)).first()
    if current is not None and current.kid == kid and not force:
        raise ValueError(f"{kid} is the key that signs new tokens; run `pie keys rotate` first (or --force)")
    if key.retired_at is None:
        key.retired_at = func.now()
        await session.flush()
    return key
