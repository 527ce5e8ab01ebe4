"""Per-job callback credentials (spec 14.5).

Every dispatched payload carries a ``callback_token``: an HS256 JWT signed with a PIE signing
key, bound to one job (its id, model, version and tenant) and expiring after the job's time-out
plus a margin. ``completemodeljob`` accepts it as the bearer token for that job only; every other
route rejects it (a different issuer and key than any caller token).

Signing keys live in the ``signing_keys`` table, so every API process and dispatcher shares
them; the first dispatch creates one when none exists. Rotation (``pie keys rotate``) adds a
newer key that signs from then on; older keys keep verifying until they are retired
(``pie keys retire KID``), so jobs in flight during a rotation still complete.

A lower module: it imports only configuration, the database base and the error types.
"""

from __future__ import annotations

import asyncio
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

from jose import JOSEError, jwt
from sqlalchemy import DateTime, String, func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from pie.db import Base
from pie.errors import Unauthorized

ISSUER = "pie-callback"
AUDIENCE = "completemodeljob"
ALGORITHM = "HS256"
# how long a dispatcher keeps using the signing key it read before looking again (a rotation
# takes effect within this time; the older key keeps verifying until it is retired)
KEY_CACHE_SECONDS = 10.0
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


async def current_key(conn: AsyncConnection | AsyncSession) -> Key:
    """The newest active signing key, created when there is none (in the caller's transaction)."""
    row = (await conn.execute(_CURRENT)).first()
    if row is None:
        await conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _KEY_LOCK})
        row = (await conn.execute(_CURRENT)).first()
        if row is None:
            key = new_key()
            await conn.execute(
                text("INSERT INTO signing_keys (kid, secret) VALUES (:kid, :secret)"),
                {"kid": key.kid, "secret": key.secret},
            )
            return key
    return Key(row.kid, row.secret)


class KeyCache:
    """A dispatcher's view of the current signing key, re-read every ``KEY_CACHE_SECONDS``."""

    def __init__(self, ttl: float = KEY_CACHE_SECONDS):
        self.ttl = ttl
        self._key: Key | None = None
        self._read_at = 0.0
        self._lock: asyncio.Lock | None = None

    def _fresh(self) -> bool:
        return self._key is not None and time.monotonic() - self._read_at < self.ttl

    async def get(self, engine: Any) -> Key:
        if self._fresh():
            return self._key  # type: ignore[return-value]
        if self._lock is None:
            self._lock = asyncio.Lock()
        # one reader per refresh: a batch of hand-overs must not each open a connection
        async with self._lock:
            if not self._fresh():
                async with engine.begin() as conn:
                    self._key = await current_key(conn)
                self._read_at = time.monotonic()
        return self._key  # type: ignore[return-value]


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


def is_callback_token(token: str) -> bool:
    """Whether ``token`` claims to be a callback token (its signature is checked by :func:`verify`)."""
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


async def verify(session: AsyncSession, token: str) -> CallbackGrant:
    """401 unless ``token`` is a valid, unexpired callback token signed by an active key."""
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
    fields = [claims.get(k) for k in ("job_id", "model_id", "model_version")]
    client_id = claims.get("client_id")
    if not all(isinstance(v, str) and v for v in fields) or not (client_id is None or isinstance(client_id, str)):
        raise Unauthorized("invalid callback token: missing job claims")
    return CallbackGrant(fields[0], fields[1], fields[2], client_id, kid)


# -- key management (the `pie keys` CLI) -------------------------------------------------------


async def list_keys(session: AsyncSession) -> list[SigningKey]:
    return list((await session.scalars(select(SigningKey).order_by(SigningKey.created_at, SigningKey.kid))).all())


async def rotate(session: AsyncSession) -> Key:
    """Add a new signing key; it signs every token from now on (older keys keep verifying)."""
    key = new_key()
    session.add(SigningKey(kid=key.kid, secret=key.secret))
    await session.flush()
    return key


async def retire(session: AsyncSession, kid: str, *, force: bool = False) -> SigningKey:
    """Stop accepting tokens signed with ``kid``. Refuses the newest active key unless forced
    (the next dispatch would simply create another)."""
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
