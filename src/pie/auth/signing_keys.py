"""The signing keys of callback tokens (``pie.callbacks``, spec 14.5, 15.5): the
``signing_keys`` table, the key that signs (read and share-locked in the claim's transaction),
and key management (``pie keys rotate`` / ``retire`` / ``list``).

Keys live in the table, so every API process and dispatcher shares them; the first dispatch
creates one when none exists. A newer key signs from its commit on; older keys keep verifying
until they are retired. ``retire`` locks the key row for update, so it waits for any claim
signing with that key and every later claim sees it retired.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from sqlalchemy import DateTime, String, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from pie.db import Base

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
