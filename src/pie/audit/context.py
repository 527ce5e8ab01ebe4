"""The audit context of one unit of work: who is writing, as what operation, on what target.

The lowest audit module (imports nothing of PIE's): logic anywhere may ask for the current
actor (``created_by`` of the rows it inserts) or add to the audit entry of the request, through
the session it already holds (``session.info``), without any parameter threaded through.
Outside a request (the dispatcher, the CLI) there is no entry: ``actor`` is None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

_KEY = "pie.audit"


def actor_of(subject: str | None, username: str | None, app_client_id: str | None) -> dict[str, Any]:
    """The documented actor object: ``sub`` always, ``username`` for humans, ``client_id``
    (the token's app client) for machine tokens (no username); the other is null."""
    return {
        "sub": subject,
        "username": username,
        "client_id": app_client_id if username is None else None,
    }


@dataclass
class AuditEntry:
    action: str
    actor: dict[str, Any] | None
    request_id: str | None = None
    client_id: str | None = None
    target_type: str | None = None
    target_id: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    # a route that answered without writing (a dry run): no audit row
    skipped: bool = False
    # the row is already written, by the statement that made the change (``pie.jobs.hot.LAUNCH``)
    recorded: bool = False


def begin(session: AsyncSession, entry: AuditEntry) -> None:
    session.info[_KEY] = entry


def end(session: AsyncSession) -> AuditEntry | None:
    return session.info.pop(_KEY, None)


def entry(session: AsyncSession) -> AuditEntry | None:
    return session.info.get(_KEY)


def actor(session: AsyncSession) -> dict[str, Any] | None:
    """The actor of the current write (None outside a request: dispatcher, CLI)."""
    current = session.info.get(_KEY)
    return current.actor if current is not None else None


def describe(
    session: AsyncSession,
    *,
    target_id: str | None = None,
    client_id: str | None = None,
    **summary: Any,
) -> None:
    """Complete the request's audit entry: the id of a target created here (generated ids),
    the tenant when the path does not name it, facts for the summary (e.g. ``from``/``to``)."""
    current = session.info.get(_KEY)
    if current is None:
        return
    if target_id is not None:
        current.target_id = target_id
    if client_id is not None:
        current.client_id = client_id
    current.summary.update(summary)


def skip(session: AsyncSession) -> None:
    """This request writes nothing (a dry run): no audit row."""
    current = session.info.get(_KEY)
    if current is not None:
        current.skipped = True
